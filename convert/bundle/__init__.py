"""An MLX bundle's files: the config and side files a conversion writes beside the shards, and reading a bundle back."""
