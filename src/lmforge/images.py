"""Container images the compiled components run in; tags equal the package version.

`lmforge images build --push REGISTRY` pushes `image(role, REGISTRY)`, and
`lmforge compile` with cluster.image_registry set names those in the pipeline.
"""

from lmforge import __version__

DEFAULT_REGISTRY = "ghcr.io/lmforge"


def image(role: str, registry: str = "") -> str:
    """The image of `role` (steps or trainer) in `registry` (default: lmforge's own)."""
    return f"{(registry or DEFAULT_REGISTRY).rstrip('/')}/lmforge-{role}:{__version__}"


STEPS_IMAGE = image("steps")
TRAINER_IMAGE = image("trainer")
