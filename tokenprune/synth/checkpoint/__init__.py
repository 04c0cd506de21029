"""The shipped mini VLM checkpoint (package data; see ``tokenprune.synth.bundled_model_path``)."""
