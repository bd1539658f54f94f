"""The paper's LLaVA-1.5 experiment (HeRA's Table 2): ``compose`` and LLaVA's downloaded data."""
