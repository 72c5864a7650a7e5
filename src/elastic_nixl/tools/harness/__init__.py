"""The project's own stand-ins for vLLM's engine loop: a stress tool, not evidence.

``vllm_objects`` builds the real vLLM objects a connector needs without
loading a model; ``engine.PDEngine`` drives a connector in both roles the way
vLLM's engine does; ``child`` / ``coordinator`` run engines in separate
processes over real NIXL; ``workload`` is the seeded grow/shrink stress run.
"""
