"""The engine: one search loop for every task (inference, training), its study and run
directory, and the warm isolated workers that evaluate candidates."""
