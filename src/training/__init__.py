"""One fold's training run: what is settled before torch loads, the data it reads, the state it steps
and saves, the loop, the validation pass, the run folder and its tracking."""
