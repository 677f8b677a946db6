"""The export domain: merge an adapter, convert to GGUF, quantise, verify, smoke-test.

Plain Python, no gRPC: `pipeline.export_gguf` runs the stages; the servicer only translates.
"""
