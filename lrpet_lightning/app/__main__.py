"""``python -m lrpet_lightning.app`` = ``lrpet-train``."""

from lrpet_lightning.app.train import main

main()
