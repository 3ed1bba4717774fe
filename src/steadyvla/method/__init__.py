"""The users' forgetting-aware fine-tuning method (DESIGN.md §6).

- ICSM (offline): the frozen pretrained model defines fragile (`U_f`) and plastic (`U_p`)
  directions of the instruction-token hidden states of chosen layers.
- HSW (`hsw.py`, online): backward hooks damp the hidden-state gradient along those directions.
- Thermostat (`thermostat.py`, online): probe-set drift steers the damping coefficients β, γ.
"""
