"""Simulators shared by the demo data generator and closed-loop evaluation."""
