"""Feature dashboards: collect per-latent data from an SAE and a cache (collect.py), write a static site (site.py)."""
