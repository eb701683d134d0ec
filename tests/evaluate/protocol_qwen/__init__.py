"""Protocol parity of the Qwen2 + SigLIP family with the original (``reference_protocols_qwen``)."""
