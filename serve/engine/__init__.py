"""The continuous-batching LLM engine and the classifier micro-batcher: scheduling,
sequences, prefix cache, grammar, the streamed completion and its metrics."""
