"""Container images the compiled components run in; tags equal the package version."""

from lmforge import __version__

STEPS_IMAGE = f"ghcr.io/lmforge/lmforge-steps:{__version__}"
TRAINER_IMAGE = f"ghcr.io/lmforge/lmforge-trainer:{__version__}"
