"""`layerwise demo`: a small GPT trained on the Python standard library, split into stages."""
