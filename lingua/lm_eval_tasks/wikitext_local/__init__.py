"""The ``wikitext_local`` lm-eval task: WikiText-2 perplexity from a local file."""
