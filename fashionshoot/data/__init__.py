"""Data: synthetic garment-lookbook set, tiered pair records and shards, public dataset readers, pose."""
