"""Publishing a bundle: its model card, and the Hugging Face Hub (sources downloaded, bundles uploaded)."""
