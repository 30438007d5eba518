"""COCO datasets, importers, topological drivers, augmentation, mask perturbation, SADF pairing,
the procedural demo dataset and the torch Datasets of the two training phases. No model imports."""
