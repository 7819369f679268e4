from etappe.cli import entry

entry()
