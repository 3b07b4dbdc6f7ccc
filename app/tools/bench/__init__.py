"""`pdserve bench`: a load generator for any OpenAI-compatible endpoint, and its statistics.

workload.py  what to send: length distributions, ShareGPT-style files, arrival patterns (fixed seeds)
client.py    how it is sent: async streaming HTTP, one timing record per request
stats.py     the arithmetic: percentiles, TTFT, TPOT, ITL, throughput, goodput under SLOs
report.py    JSON results and matplotlib plots (CDFs, goodput vs rate)
"""
