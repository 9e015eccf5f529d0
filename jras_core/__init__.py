"""J-RAS: joint retrieval-augmented segmentation, the method and its building blocks."""
