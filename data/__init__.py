"""COCO datasets, importers, topological drivers, augmentation, mask perturbation, SADF pairing,
the procedural demo dataset and the torch Datasets of the two training phases. No model imports.

Modules (one responsibility each):
    files          atomic writes (temporary name, then os.replace)
    images         read_image (8-bit RGB, EXIF orientation), read_mask (stored values), tensors
    masks          mask <-> RLE <-> polygon, exact areas and boxes, connected-component instances
    coco           load/validate/save/merge/split/subset/stats of COCO dicts (absolute file names)
    importers      mask folders, class-index masks, LabelMe, image folders -> COCO (CLI)
    palette        the fixed class colour of each category id
    drivers        the topological driver (paper 4.2)
    drivers_sheet  PNG sheet of image | driver pairs (CLI)
    augment        offline augmentation of defect-free images (paper 5.1) (CLI)
    perturb        random shape perturbation and placement of masks (paper 4.3)
    prompts        prompt templates ("an image of a [V] with a [class] crack")
    pairing        SADF pairs: image variant + perturbed masks + driver + prompt
    resize         resize-and-crop to the training resolution (multiples of 64)
    datasets       ConceptDataset, ConditionDataset, collate
    demo           the procedural demo dataset (CLI)
    seeding        stable per-item seeds: derive_seed(seed, *keys)

Conventions: images uint8 RGB (H, W, 3) in numpy, float32 (3, H, W) in [-1, 1] as tensors;
drivers float32 (3, H, W) in [0, 1]; masks uint8 (H, W), 0 = background, value = category id
(or {0, 1} for one instance).
"""
