"""What a model becomes: serving bundles, optimized variants, TensorFlow conversion, local prediction."""
