"""phi-1 synthetic data: an LLM generation engine for OpenAI-compatible endpoints (``data_gen.llm``),
the synthetic textbook and CodeExercises generators, and shared MinHash near-duplicate removal.

No jax / tensorflow imports here: generation runs on any CPU host.
"""
