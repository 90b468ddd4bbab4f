"""Runtimes: one typed protocol, a loader from artifact format to runtime, one module per
format, the step-level LMs the engine drives, and shared token/text handling."""
