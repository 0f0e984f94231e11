"""Compatibility: the old home of the registered language model's pyfunc class.

In: nothing. Out: `FairseqLanguageModel` (and the rest of `lmforge.models.scoring`) under the
name `lmforge.scoring`. Models registered before lmforge 0.2 pickled their pyfunc as
`lmforge.scoring.FairseqLanguageModel`; unpickling imports this module, which hands over the one
class, so they keep loading and scoring. New code imports `lmforge.models.scoring`.

    python -c "import mlflow; print(mlflow.pyfunc.load_model('models:/lmforge-lm@champion').predict(['the cat']))"
"""

from lmforge.models.scoring import *  # noqa: F401,F403
from lmforge.models.scoring import FairseqLanguageModel  # noqa: F401
