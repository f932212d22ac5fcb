"""Benchmarks of nexus_sli against transformers, accelerate disk offload and AirLLM.

Run ``python -m benchmarks.run`` (see ``benchmarks/README.md``). Nothing here is imported by
the package; the comparison tools (accelerate, airllm, matplotlib) are benchmark-only extras.
"""
