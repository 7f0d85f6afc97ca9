"""imattrain: train, evaluate and predict from imatdata's clean Parquet shards."""

__version__ = "0.1.0"
