"""The GPT judge of the open-ended benchmarks (``python -m ppllava_jax.judge``): the original's
judge prompts sent to an OpenAI-compatible chat endpoint for the answers ``eval.py`` wrote
(open-ended QA, VCGBench), the replies parsed and summarised as the original does.

prompts.py (the original's texts), inputs.py (the judge inputs eval.py writes), client.py (the
endpoint, retries), verdicts.py (parsing, summaries), store.py (one result file per question),
run.py (the loop), __main__.py (the command line). It sits on top: it may import
``ppllava_jax.evaluate``; nothing imports it.
"""
