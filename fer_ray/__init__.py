"""fer_ray: train, tune and run facial-emotion classifiers with Ray."""

import os

# albumentations asks PyPI for its latest version when imported, in every process that
# imports it (the driver, each Ray Data worker, training worker and scoring actor): a
# request to the internet per process, up to 2 s each where a firewall drops it, and a
# warning in every worker's log where there is no network (seen on an offline GPU machine).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
