"""Files on disk: models' metadata and weights read, safetensors shards and tokenizers written, models resolved."""
