"""How training processes are started: every launcher runs `lmforge.worker` with the same contract."""
