"""The two training phases (`train.concept`, `train.condition`), the demo's tiny prior
(`train.prior`), their small shared helpers, and the speed benchmarks of one training step
(`train.speed`). Nothing imports train/ but the umbrella command (defectsynth/) and the tests."""
