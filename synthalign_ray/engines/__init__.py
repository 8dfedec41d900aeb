"""Model backends behind small builders: vLLM through `ray.data.llm` (vllm_engine), and later
transformers and OpenAI-compatible HTTP, each chosen per stage in the config."""
