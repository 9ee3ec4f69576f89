"""``prediction_errors``: prediction errors on a vocabulary slice. See README.md in this folder."""
