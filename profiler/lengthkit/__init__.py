"""Real-model machinery behind ``kvprof lengths``: method settings, the compressed-cache generation engine,
the prompt set loader and the agreement metrics. Importing the engine needs torch + transformers."""
