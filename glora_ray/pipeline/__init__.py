"""The whole job: train (stage 1), search (stage 2), test, merge and export (stage 3) per dataset."""
