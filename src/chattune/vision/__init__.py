"""Vision-language models: images named by data rows and requests, read safely
(:mod:`~chattune.vision.images`), and a model's processor turning them into image tokens and
pixels (:mod:`~chattune.vision.processor`)."""
