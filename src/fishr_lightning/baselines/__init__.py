"""Fishr's comparison set (the baselines of the paper's Tables 3-4), as DomainBed computes them.

``functional`` holds the maths in pure torch; the callbacks add each penalty to any LightningModule.
"""
