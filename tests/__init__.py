"""Tests for iscl_hsm."""
