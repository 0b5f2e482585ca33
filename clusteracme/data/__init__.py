"""Files shipped with the package: the trust store presets (``letsencrypt-roots.pem``)."""
