"""The product: generation runs, evaluation, history, jobs and the command line."""
