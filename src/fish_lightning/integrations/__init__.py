"""FISH in other training frameworks: thin adapters over :class:`~fish_lightning.masker.masker.FishMasker`
(``fish_lightning.integrations.transformers``: Hugging Face's ``Trainer``)."""
