"""Evaluation: the sandbox, the code-eval harness, HumanEval, MBPP, held-out perplexity."""
