"""The Hydra training app: datamodules, models, the classifier LightningModule, ``train(cfg)``."""
