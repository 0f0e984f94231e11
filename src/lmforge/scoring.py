"""Compatibility: models registered before lmforge 0.2 pickled their pyfunc as
`lmforge.scoring.FairseqLanguageModel`; that name still loads them. New code
imports `lmforge.models.scoring`."""

from lmforge.models.scoring import *  # noqa: F401,F403
from lmforge.models.scoring import FairseqLanguageModel  # noqa: F401
