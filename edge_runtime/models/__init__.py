"""What an artifact is, manifests, the store and where it lives, the embedded models, what a
``--model`` value names."""

# The help text of every --model option (the CLI's and the on-device suite's): one copy, here
# where importing it costs nothing, so no command's help falls behind what ``models.spec`` accepts.
MODEL_HELP = ("A .gguf or .tflite file, an ONNX folder, a folder `edgert convert` wrote, or a store or embedded "
              "model name; NAME:QUANT picks one artifact (default: smollm2, the embedded model).")
