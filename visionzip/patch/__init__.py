"""Model integrations: one module per transformers model family.

A family module provides:

- `MODEL`: the class name of the transformers base model it serves (`type(model.model).__name__`);
- `PRESETS_KEY`: its key in `visionzip.PRESETS` (the paper's budgets for it);
- `num_tiles(config, image_size)`: the 336x336 tiles one image of (H, W) becomes;
- `stock_count(handle, image_size)` and `reduced_count(handle, image_size, settings)`: the visual
  tokens of one image without and with reduction, known before any pixel is seen;
- `reduced_image_features(handle, pixel_values, image_sizes, settings, **tower_kwargs)`: what its
  `get_image_features` returns under reduction (per-tile methods through `encode.reduce_tiles`,
  per-image ones through `encode.reduce_packed`), recording one `ImageSelection` per image;
- `patch(handle)`: installs both (`common.install`) and returns the function that undoes it.

Optional, for a tower that is no plain ViT (Qwen2.5-VL's windowed tower and merger):
- `tower(handle)`: (patches per tile side, CLS tokens per tile, signal layer index, a function that makes
  its signal hooks), in place of `core.vit_tower`, which reads CLIP's and SigLIP's from the config and
  the tower (one CLS token where the tower has a class embedding, none on SigLIP);
- `check_settings(handle, settings)`: budget rules of its own, in place of `Budget.check` and the
  method's per-tile `check` (`core.checked_settings`);
- `BUDGET_PER_IMAGE = True` when it has no tiles (every budget counts one image's tokens), with what the
  app's budget slider (`app/scrub.py`) needs to choose again at any budget from one tower run:
  `tower_cells(handle, pixel_values, grid_thw, attention)` (per image, the tower's outputs and signal),
  `cells_selection(cells, settings)` (what a real call would record) and `budget_values(handle, image_size,
  method)` (every budget the method runs at on that image).
- `num_video_tokens(handle, (frames, height, width), settings)` when the model takes a clip through its own
  video path (Qwen2.5-VL: frames paired in time), reduced there; the app then hands it the clip natively.

Adding a family is that file plus its line in `FAMILIES` below.
"""

from . import llava, llava_next, llava_onevision, qwen2_5_vl

FAMILIES = {family.MODEL: family for family in (llava, llava_next, llava_onevision, qwen2_5_vl)}
