"""The contract every backend keeps, run against llama.cpp, ONNX Runtime GenAI and LiteRT alike."""
