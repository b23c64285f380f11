"""Writes the example notebooks (run it after editing them here: python examples/make_notebooks.py)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def notebook(name: str, cells: list) -> None:
    nb = new_notebook(cells=[])
    for cell in cells:
        if isinstance(cell, tuple):  # ("parameters", source)
            c = new_code_cell(cell[1])
            c.metadata["tags"] = [cell[0]]
        elif cell.startswith("# "):
            c = new_markdown_cell(cell)
        elif cell.startswith("md:"):
            c = new_markdown_cell(cell[3:].strip())
        else:
            c = new_code_cell(cell)
        nb.cells.append(c)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, HERE / name)


PRODUCTS = '''import random
import pandas as pd

random.seed(0)
names = ["Aurora Lamp", "Brisk Kettle", "Cobalt Mug", "Drift Chair", "Ember Candle", "Fjord Blanket",
         "Glint Vase", "Harbor Clock", "Iris Pillow", "Juniper Tray", "Kestrel Stool", "Lumen Bulb"]
colours = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
openers = ["Meet the {n}: a {c} piece priced at ${p}.", "Our {n} in {c} now sells for ${p}.",
           "For ${p} you get the {n}, finished in {c}.", "The {c} {n} is available for ${p} today."]
rows = []
for i in range(N_PRODUCTS):
    n, c, p = random.choice(names), random.choice(colours), random.randint(5, 400)
    rows.append({"prompt": "Product line for: " + random.choice(openers).format(n=n, c=c, p=p),
                 "response": f"{n} | {p} | {c}"})
products = pd.DataFrame(rows)
products.head(3)'''

HOUSES = '''import numpy as np
import pandas as pd

rng = np.random.default_rng(0)
def houses(n, start=0):
    rooms = rng.integers(1, 7, n)
    area = rng.normal(90, 25, n).round(1)
    district = rng.choice(["north", "south", "centre"], n)
    price = 40 * rooms + 1.8 * area + np.select([district == "centre", district == "north"], [90, 30], 0) + rng.normal(0, 15, n)
    return pd.DataFrame({"house_id": range(start, start + n), "rooms": rooms, "area": area, "district": district, "price": price.round(1)})

sales = houses(N_HOUSES)
new_sales = houses(N_HOUSES // 2, start=N_HOUSES)'''

HANDBOOK = '''import pandas as pd

handbook = pd.DataFrame([
    {"id": "leave-1", "section": "leave", "text": "New employees at Quillfeather get 23 vacation days per year, rising to 27 after three years."},
    {"id": "leave-2", "section": "leave", "text": "Parental leave at Quillfeather is 19 weeks at full pay for every parent."},
    {"id": "it-1", "section": "it", "text": "The Quillfeather VPN is called Tern and its help desk code is QF-7781."},
    {"id": "it-2", "section": "it", "text": "Laptops are replaced every 41 months; request one from the Otterbox portal."},
    {"id": "office-1", "section": "office", "text": "The Quillfeather office is on the 9th floor of the Marrow Building in Lisbon."},
    {"id": "office-2", "section": "office", "text": "Lunch is served in the Kelp Room from 12:15 to 13:45 on weekdays."},
    {"id": "pay-1", "section": "pay", "text": "Salaries at Quillfeather are paid on the 26th of each month."},
    {"id": "pay-2", "section": "pay", "text": "Travel expenses are filed in Ledgerline within 14 days of the trip."},
])
questions = pd.DataFrame([
    {"question": "How many vacation days do new employees get?", "answer": "23", "source_id": "leave-1"},
    {"question": "What is the help desk code of the VPN?", "answer": "QF-7781", "source_id": "it-1"},
    {"question": "On which floor is the office?", "answer": "9th", "source_id": "office-1"},
    {"question": "On what day of the month are salaries paid?", "answer": "26th", "source_id": "pay-1"},
])'''

notebook("quickstart.ipynb", [
    "# nbcustom quickstart\n\nAll three magics on small data made right here, with the embedded default models "
    "(SmolLM2-135M-Instruct and all-MiniLM-L6-v2): nothing is downloaded and nothing leaves the machine.",
    ("parameters", "N_PRODUCTS = 64      # rows for the LLM fine-tune\nFINETUNE_STEPS = 16  # LoRA optimizer steps\nN_HOUSES = 400       # rows for the AutoML model\nTIME_LIMIT = 20      # seconds per AutoGluon fit"),
    "%load_ext nbcustom",
    "md: ## 1. `%%finetune`: teach an LLM a house format\nProduct descriptions in, one line `name | price | colour` out. The base model cannot do this; LoRA teaches it in a minute on a CPU.",
    PRODUCTS,
    "%%finetune product_line --max-steps $FINETUNE_STEPS --lr 2e-3 --eval-frac 0.15 --max-new-tokens 24\nSELECT prompt, response FROM products",
    "%%predict product_line\nSELECT 'Product line for: The grey Cobalt Mug is available for $12 today.' AS prompt",
    "md: ## 2. `%%retrain`: an AutoML model, then again with new rows",
    HOUSES,
    "%%retrain house_prices --target price --key house_id --time-limit $TIME_LIMIT\nSELECT * FROM sales",
    "%%retrain house_prices --time-limit $TIME_LIMIT\nSELECT * FROM new_sales",
    "%%predict house_prices\nSELECT * FROM new_sales LIMIT 5",
    "md: ## 3. `%%rag`: answers with sources over table rows",
    HANDBOOK,
    "%%rag handbook --metadata section\nSELECT * FROM handbook",
    "%%rag handbook --ask\nHow many vacation days do new employees get?\nWhat is the help desk code of the VPN?",
    "%%rag handbook --eval\nSELECT * FROM questions",
    "md: ## The store\nEvery run above is a numbered version with its manifest, metrics and charts.",
    "%nbc list",
    "%nbc versions house_prices",
])

notebook("finetune_support_bot.ipynb", [
    "# A support bot that answers in the house style\n\nA help desk answers every ticket in one fixed shape: "
    "`[CATEGORY] answer — Team Nimbus`. We teach the embedded SmolLM2 that shape with LoRA on past tickets, "
    "check the before/after numbers on held-out tickets, and continue training when more tickets arrive.",
    ("parameters", "N_TICKETS = 80\nSTEPS = 16\nMORE_STEPS = 6"),
    "%load_ext nbcustom",
    '''import duckdb, random
import pandas as pd

random.seed(1)
issues = {
    "BILLING": [("I was charged twice for {m}", "refunds for double charges on {m} arrive within 5 days")],
    "ACCESS": [("I cannot log in to {m}", "reset your {m} password from the sign-in page")],
    "SHIPPING": [("Where is my {m} order?", "your {m} order ships within 2 working days")],
}
products = ["Nimbus Pro", "Nimbus Go", "Nimbus Home", "Nimbus Kids", "Nimbus Cloud"]
rows = []
for i in range(N_TICKETS):
    category = random.choice(list(issues))
    question, answer = random.choice(issues[category])
    product = random.choice(products)
    rows.append({"ticket_id": i, "question": question.format(m=product), "answer": f"[{category}] " + answer.format(m=product).capitalize() + " — Team Nimbus"})
tickets = pd.DataFrame(rows)
duckdb.sql("CREATE OR REPLACE TABLE tickets AS SELECT * FROM tickets")
tickets.head()''',
    "%%finetune support_bot --max-steps $STEPS --lr 2e-3 --max-new-tokens 32 --system \"You are the Nimbus help desk.\"\nSELECT question AS prompt, answer AS response FROM tickets WHERE ticket_id < {{N_TICKETS}} * 3 / 4",
    "md: New tickets came in. Running `%%finetune` on the same name continues from version 1's adapter.",
    "%%finetune support_bot --max-steps $MORE_STEPS --lr 1e-3 --max-new-tokens 32 --system \"You are the Nimbus help desk.\"\nSELECT question AS prompt, answer AS response FROM tickets WHERE ticket_id >= {{N_TICKETS}} * 3 / 4",
    "%%predict support_bot\nSELECT 'I cannot log in to Nimbus Go' AS prompt UNION ALL SELECT 'Where is my Nimbus Home order?'",
    "%nbc compare support_bot 1 2",
    "%nbc show support_bot",
])

notebook("retrain_forecast.ipynb", [
    "# Forecasting demand as new days arrive\n\nA shop's daily sales: version 1 is trained on the history, then a new "
    "batch of days arrives and `%%retrain` trains version 2 from scratch on old + new rows. Both versions are "
    "scored on the same holdout (the last `horizon` days of the series), with a forecast-vs-actual chart.",
    ("parameters", "HISTORY_DAYS = 240\nNEW_DAYS = 60\nHORIZON = 14\nTIME_LIMIT = 30"),
    "%load_ext nbcustom",
    '''import numpy as np
import pandas as pd

rng = np.random.default_rng(7)
days = pd.date_range("2025-01-01", periods=HISTORY_DAYS + NEW_DAYS, freq="D")
t = np.arange(len(days))
sales = 200 + 0.3 * t + 35 * np.sin(2 * np.pi * t / 7) + rng.normal(0, 8, len(days))
demand = pd.DataFrame({"day": days, "sales": sales.round(1)})
history, new_days = demand.iloc[:HISTORY_DAYS], demand.iloc[HISTORY_DAYS:]''',
    "%%retrain demand --target sales --timestamp day --horizon $HORIZON --time-limit $TIME_LIMIT\nSELECT * FROM history",
    "md: Two months of new sales arrive: retrain from scratch on everything, compare with version 1 on the same holdout.",
    "%%retrain demand --time-limit $TIME_LIMIT\nSELECT * FROM new_days",
    "%%predict demand\nSELECT * FROM demand",
    "%nbc versions demand",
    "%nbc compare demand 1 2",
])

notebook("rag_handbook.ipynb", [
    "# Answers from the employee handbook, with sources\n\nIndex the handbook's rows, ask questions, edit a "
    "page and refresh (only the changed row is embedded again), then evaluate: the LLM alone against the LLM "
    "with retrieval.",
    ("parameters", "TOP_K = 2"),
    "%load_ext nbcustom",
    HANDBOOK,
    "%%rag handbook --metadata section --top-k $TOP_K\nSELECT * FROM handbook",
    "%%rag handbook --ask\nHow many vacation days do new employees get?\nWhen are salaries paid?",
    "md: The vacation policy changed. Edit the row and refresh: one row changed, the rest are reused.",
    '''handbook.loc[handbook.id == "leave-1", "text"] = "New employees at Quillfeather get 25 vacation days per year, rising to 28 after three years."
questions.loc[0, "answer"] = "25"''',
    "%%rag handbook --metadata section --top-k $TOP_K\nSELECT * FROM handbook",
    "%%rag handbook --eval\nSELECT * FROM questions",
    "%%predict handbook\nSELECT 'How long is parental leave?' AS question",
    "%nbc versions handbook",
])
